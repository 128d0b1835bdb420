//! The CSI Identity and Controller services: a thin adapter that validates and converts each
//! request, calls the [`Service`], and converts back. Errors become gRPC codes in [`status`] only.

use std::collections::HashMap;
use std::sync::Arc;

use csi::controller_service_capability::rpc::Type as Rpc;
use csi::volume_capability::access_mode::Mode;
use csi_proto::v1 as csi;
use tonic::{Request, Response, Status};

use crate::error::ControllerError;
use crate::params::{FsType, VolumeParams};
use crate::service::{CreateVolume, Publish, Service};
use crate::store::{SnapshotRecord, VolumeRecord, VolumeSource};

pub use csi_proto::DRIVER_NAME;

/// The one place controller errors become gRPC statuses.
pub fn status(e: ControllerError) -> Status {
    let msg = e.to_string();
    match e {
        ControllerError::InvalidArgument(_) => Status::invalid_argument(msg),
        ControllerError::NotFound(_) => Status::not_found(msg),
        ControllerError::AlreadyExists(_) => Status::already_exists(msg),
        ControllerError::FailedPrecondition(_) => Status::failed_precondition(msg),
        ControllerError::OutOfRange(_) => Status::out_of_range(msg),
        ControllerError::ResourceExhausted(_) => Status::resource_exhausted(msg),
        ControllerError::Aborted(_) => Status::aborted(msg),
        ControllerError::Unavailable(_) => Status::unavailable(msg),
        ControllerError::Store(_) => Status::internal(msg),
        // Processes starting or restarting: the CO retries.
        ControllerError::Orchestrator { .. } => Status::unavailable(msg),
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// A supported capability: (block, access mode).
fn capability(c: &csi::VolumeCapability) -> Result<(bool, i32), ControllerError> {
    let bad = |m: String| ControllerError::InvalidArgument(m);
    let mode = c.access_mode.as_ref().ok_or_else(|| bad("volume capability has no access_mode".into()))?.mode;
    match Mode::try_from(mode) {
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => {}
        Ok(Mode::Unknown) => return Err(bad("volume capability access mode is UNKNOWN".into())),
        Ok(m) => {
            return Err(bad(format!(
                "access mode {} is not supported: a Barnacle volume attaches to one node",
                m.as_str_name()
            )));
        }
        Err(_) => return Err(bad(format!("access mode {mode} is not a CSI access mode"))),
    }
    match &c.access_type {
        Some(csi::volume_capability::AccessType::Block(_)) => Ok((true, mode)),
        Some(csi::volume_capability::AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() {
                FsType::parse(&m.fs_type)?;
            }
            Ok((false, mode))
        }
        None => Err(bad("volume capability has neither block nor mount".into())),
    }
}

fn capabilities(caps: &[csi::VolumeCapability]) -> Result<(), ControllerError> {
    if caps.is_empty() {
        return Err(ControllerError::InvalidArgument("volume_capabilities is required".into()));
    }
    caps.iter().try_for_each(|c| capability(c).map(|_| ()))
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() { Err(invalid(format!("{field} is required"))) } else { Ok(()) }
}

fn timestamp(unix: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: i64::try_from(unix).unwrap_or(i64::MAX), nanos: 0 }
}

fn content_source(s: &Option<VolumeSource>) -> Option<csi::VolumeContentSource> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource as Vs};
    s.as_ref().map(|s| csi::VolumeContentSource {
        r#type: Some(match s {
            VolumeSource::Snapshot(id) => Type::Snapshot(SnapshotSource { snapshot_id: id.clone() }),
            VolumeSource::Volume(id) => Type::Volume(Vs { volume_id: id.clone() }),
        }),
    })
}

fn volume(v: &VolumeRecord) -> csi::Volume {
    csi::Volume {
        capacity_bytes: i64::try_from(v.size).unwrap_or(i64::MAX),
        volume_id: v.id.clone(),
        volume_context: v.params.volume_context(),
        content_source: content_source(&v.source),
        // Reachable from every node: the engine runs where the volume is attached.
        accessible_topology: Vec::new(),
    }
}

fn snapshot(s: &SnapshotRecord) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: i64::try_from(s.size).unwrap_or(i64::MAX),
        snapshot_id: s.id.clone(),
        source_volume_id: s.volume_id.clone(),
        creation_time: Some(timestamp(s.created_unix)),
        ready_to_use: s.ready,
        group_snapshot_id: s.group.as_ref().map(|g| g.id.clone()).unwrap_or_default(),
    }
}

fn max_entries(n: i32) -> Result<usize, Status> {
    usize::try_from(n).map_err(|_| invalid("max_entries must not be negative"))
}

/// The Identity service of the controller.
#[derive(Debug)]
pub struct Identity {
    pub service: Arc<Service>,
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
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: csi_proto::plugin_capabilities(),
        }))
    }

    async fn probe(&self, _: Request<csi::ProbeRequest>) -> Result<Response<csi::ProbeResponse>, Status> {
        let ready = self.service.probe().await.map_err(status)?;
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}

/// The Controller service.
#[derive(Debug)]
pub struct Controller {
    pub service: Arc<Service>,
}

impl Controller {
    async fn published_status(&self, v: &VolumeRecord) -> (Vec<String>, csi::VolumeCondition) {
        let c = self.service.condition(v).await;
        let nodes = v.attachment.iter().map(|a| a.node.clone()).collect();
        (nodes, csi::VolumeCondition { abnormal: c.abnormal, message: c.message })
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Controller {
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        required("name", &r.name)?;
        if r.name.len() > 253 {
            return Err(invalid("name is longer than 253 bytes"));
        }
        capabilities(&r.volume_capabilities).map_err(status)?;
        // A VolumeAttributesClass's parameters come as mutable_parameters and win over the class's.
        let params = VolumeParams::parse(&r.parameters)
            .and_then(|p| p.with_mutable(&r.mutable_parameters))
            .map_err(status)?;
        for c in &r.volume_capabilities {
            if let Some(csi::volume_capability::AccessType::Mount(m)) = &c.access_type
                && let Some(fs) = params.fs_type
                && !m.fs_type.is_empty()
                && m.fs_type != fs.as_str()
            {
                return Err(invalid(format!(
                    "the capability asks for {} but the parameters for {}",
                    m.fs_type,
                    fs.as_str()
                )));
            }
        }
        let source = match r.volume_content_source.and_then(|s| s.r#type) {
            Some(csi::volume_content_source::Type::Snapshot(s)) => {
                required("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)?;
                Some(VolumeSource::Snapshot(s.snapshot_id))
            }
            Some(csi::volume_content_source::Type::Volume(v)) => {
                required("volume_content_source.volume.volume_id", &v.volume_id)?;
                Some(VolumeSource::Volume(v.volume_id))
            }
            None => None,
        };
        let range = r.capacity_range.unwrap_or_default();
        let topo = r.accessibility_requirements.unwrap_or_default();
        let v = self
            .service
            .create_volume(CreateVolume {
                name: r.name,
                required_bytes: range.required_bytes,
                limit_bytes: range.limit_bytes,
                params,
                source,
                requisite: topo.requisite.into_iter().map(|t| t.segments).collect(),
                preferred: topo.preferred.into_iter().map(|t| t.segments).collect(),
            })
            .await
            .map_err(status)?;
        Ok(Response::new(csi::CreateVolumeResponse { volume: Some(volume(&v)) }))
    }

    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        self.service.delete_volume(&r.volume_id).await.map_err(status)?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        required("node_id", &r.node_id)?;
        let cap = r.volume_capability.as_ref().ok_or_else(|| invalid("volume_capability is required"))?;
        let (block, access_mode) = capability(cap).map_err(status)?;
        let readonly = r.readonly || access_mode == Mode::SingleNodeReaderOnly as i32;
        let publish_context = self
            .service
            .publish(Publish { volume_id: r.volume_id, node: r.node_id, readonly, block, access_mode })
            .await
            .map_err(status)?;
        Ok(Response::new(csi::ControllerPublishVolumeResponse { publish_context }))
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        let node = Some(r.node_id.as_str()).filter(|n| !n.is_empty());
        self.service.unpublish(&r.volume_id, node).await.map_err(status)?;
        Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities is required"));
        }
        let v = self.service.get_volume(&r.volume_id).await.map_err(status)?;
        let unsupported = r.volume_capabilities.iter().find_map(|c| capability(c).err());
        let params_match = v.params.satisfies(&r.parameters, &r.mutable_parameters).unwrap_or(false);
        let fs_conflict =
            r.volume_capabilities.iter().find_map(|c| match (&c.access_type, v.params.fs_type) {
                (Some(csi::volume_capability::AccessType::Mount(m)), Some(fs))
                    if !m.fs_type.is_empty() && m.fs_type != fs.as_str() =>
                {
                    Some(format!("the volume's filesystem is {}, not {}", fs.as_str(), m.fs_type))
                }
                _ => None,
            });
        let unsupported = unsupported.map(|e| e.to_string()).or(fs_conflict);
        let ctx = v.params.volume_context();
        let ctx_match = r.volume_context.is_empty() || r.volume_context == ctx;
        let resp = match unsupported {
            Some(message) => csi::ValidateVolumeCapabilitiesResponse { confirmed: None, message },
            None if !params_match => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: "the parameters differ from the volume's".into(),
            },
            None if !ctx_match => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: "the volume context differs from the volume's".into(),
            },
            None => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
        };
        Ok(Response::new(resp))
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let max = max_entries(r.max_entries)?;
        let (page, next_token) = self.service.list_volumes(&r.starting_token, max).await.map_err(status)?;
        let mut entries = Vec::with_capacity(page.len());
        for v in &page {
            let (published_node_ids, condition) = self.published_status(v).await;
            entries.push(csi::list_volumes_response::Entry {
                volume: Some(volume(v)),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids,
                    volume_condition: Some(condition),
                }),
            });
        }
        Ok(Response::new(csi::ListVolumesResponse { entries, next_token }))
    }

    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        let params = VolumeParams::parse(&r.parameters).map_err(status)?;
        if r.volume_capabilities.iter().any(|c| capability(c).is_err()) {
            // No capacity for volumes this driver cannot make.
            return Ok(Response::new(csi::GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: Some(0),
                minimum_volume_size: None,
            }));
        }
        let topo = r.accessible_topology.map(|t| t.segments);
        let (available, largest) = self.service.capacity(&params, topo.as_ref()).await.map_err(status)?;
        let i = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: i(available),
            maximum_volume_size: Some(i(largest)),
            minimum_volume_size: Some(i(crate::service::SIZE_UNIT)),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        let rpcs = [
            Rpc::CreateDeleteVolume,
            Rpc::PublishUnpublishVolume,
            Rpc::ListVolumes,
            Rpc::GetCapacity,
            Rpc::CreateDeleteSnapshot,
            Rpc::ListSnapshots,
            Rpc::CloneVolume,
            Rpc::PublishReadonly,
            Rpc::ExpandVolume,
            Rpc::ListVolumesPublishedNodes,
            Rpc::VolumeCondition,
            Rpc::GetVolume,
            Rpc::SingleNodeMultiWriter,
            Rpc::GetSnapshot,
            Rpc::ModifyVolume,
        ];
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: rpcs
                .into_iter()
                .map(|t| csi::ControllerServiceCapability {
                    r#type: Some(csi::controller_service_capability::Type::Rpc(
                        csi::controller_service_capability::Rpc { r#type: t as i32 },
                    )),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        required("name", &r.name)?;
        required("source_volume_id", &r.source_volume_id)?;
        crate::params::check_snapshot_params(&r.parameters).map_err(status)?;
        let s = self.service.create_snapshot(&r.name, &r.source_volume_id).await.map_err(status)?;
        Ok(Response::new(csi::CreateSnapshotResponse { snapshot: Some(snapshot(&s)) }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        required("snapshot_id", &r.snapshot_id)?;
        self.service.delete_snapshot(&r.snapshot_id).await.map_err(status)?;
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        let max = max_entries(r.max_entries)?;
        let (page, next_token) = self
            .service
            .list_snapshots(&r.starting_token, max, &r.snapshot_id, &r.source_volume_id)
            .await
            .map_err(status)?;
        Ok(Response::new(csi::ListSnapshotsResponse {
            entries: page
                .iter()
                .map(|s| csi::list_snapshots_response::Entry { snapshot: Some(snapshot(s)) })
                .collect(),
            next_token,
        }))
    }

    async fn get_snapshot(
        &self,
        req: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let r = req.into_inner();
        required("snapshot_id", &r.snapshot_id)?;
        let s = self
            .service
            .snapshot(&r.snapshot_id)
            .await
            .map_err(status)?
            .ok_or_else(|| Status::not_found(format!("snapshot {} does not exist", r.snapshot_id)))?;
        Ok(Response::new(csi::GetSnapshotResponse { snapshot: Some(snapshot(&s)) }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        let range = r.capacity_range.ok_or_else(|| invalid("capacity_range is required"))?;
        let block = match &r.volume_capability {
            Some(c) => capability(c).map_err(status)?.0,
            None => false,
        };
        let size = self
            .service
            .expand(&r.volume_id, range.required_bytes, range.limit_bytes)
            .await
            .map_err(status)?;
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
            // A filesystem grows on the node; a block volume is done.
            node_expansion_required: !block,
        }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        let v = self.service.get_volume(&r.volume_id).await.map_err(status)?;
        let (published_node_ids, condition) = self.published_status(&v).await;
        Ok(Response::new(csi::ControllerGetVolumeResponse {
            volume: Some(volume(&v)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids,
                volume_condition: Some(condition),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        req: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        self.service.modify_volume(&r.volume_id, &r.mutable_parameters).await.map_err(status)?;
        Ok(Response::new(csi::ControllerModifyVolumeResponse {}))
    }
}

/// The GroupController service: volume group snapshots.
#[derive(Debug)]
pub struct GroupController {
    pub service: Arc<Service>,
}

fn group_snapshot(id: String, members: &[SnapshotRecord]) -> csi::VolumeGroupSnapshot {
    csi::VolumeGroupSnapshot {
        group_snapshot_id: id,
        snapshots: members.iter().map(snapshot).collect(),
        creation_time: members.iter().map(|s| s.created_unix).min().map(timestamp),
        ready_to_use: members.iter().all(|s| s.ready),
    }
}

#[tonic::async_trait]
impl csi::group_controller_server::GroupController for GroupController {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        use csi::group_controller_service_capability::{Rpc, Type, rpc::Type as T};
        Ok(Response::new(csi::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![csi::GroupControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc { r#type: T::CreateDeleteGetVolumeGroupSnapshot as i32 })),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        required("name", &r.name)?;
        if r.source_volume_ids.is_empty() {
            return Err(invalid("source_volume_ids is required"));
        }
        if r.source_volume_ids.iter().any(String::is_empty) {
            return Err(invalid("source_volume_ids has an empty id"));
        }
        crate::params::check_group_snapshot_params(&r.parameters).map_err(status)?;
        let (id, members) =
            self.service.create_group_snapshot(&r.name, &r.source_volume_ids).await.map_err(status)?;
        Ok(Response::new(csi::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_snapshot(id, &members)),
        }))
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        required("group_snapshot_id", &r.group_snapshot_id)?;
        self.service.delete_group_snapshot(&r.group_snapshot_id, &r.snapshot_ids).await.map_err(status)?;
        Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}))
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        required("group_snapshot_id", &r.group_snapshot_id)?;
        let members =
            self.service.get_group_snapshot(&r.group_snapshot_id, &r.snapshot_ids).await.map_err(status)?;
        Ok(Response::new(csi::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_snapshot(r.group_snapshot_id, &members)),
        }))
    }
}
