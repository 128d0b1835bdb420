//! The administration API (`proto/admin.proto`): volumes with their names, replicas, attachment
//! and condition; annotations; a replica-kill fault for demos; nodes. Served beside CSI on the
//! controller's socket, for the `barnacle` CLI.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::status;
use crate::error::ControllerError;
use crate::service::Service;
use crate::store::{VolumeRecord, VolumeSource};

pub mod pb {
    #![allow(clippy::all, missing_debug_implementations, rust_2018_idioms)]
    tonic::include_proto!("barnacle.admin.v1");
}

/// The Admin service.
#[derive(Debug)]
pub struct Admin {
    pub service: Arc<Service>,
}

impl Admin {
    async fn info(&self, v: &VolumeRecord) -> pb::VolumeInfo {
        let d = self.service.details(v).await;
        let (source_kind, source_id) = match &v.source {
            Some(VolumeSource::Snapshot(id)) => ("snapshot", id.clone()),
            Some(VolumeSource::Volume(id)) => ("volume", id.clone()),
            None => ("", String::new()),
        };
        pb::VolumeInfo {
            id: v.id.clone(),
            name: v.name.clone(),
            size_bytes: v.size,
            replicas_wanted: u32::try_from(v.params.replicas).unwrap_or(u32::MAX),
            min_healthy_replicas: u32::try_from(v.params.min_healthy_replicas).unwrap_or(u32::MAX),
            rebuild_mib_per_sec: v.params.rebuild_mib_per_sec.unwrap_or(0),
            max_iops: v.params.max_iops,
            max_mib_per_sec: v.params.max_mib_per_sec,
            fs_type: v.params.fs_type.map(|f| f.as_str().to_owned()).unwrap_or_default(),
            thin: v.params.thin,
            state: format!("{:?}", v.state).to_lowercase(),
            source_kind: source_kind.to_owned(),
            source_id,
            attached_node: v.attachment.as_ref().map(|a| a.node.clone()).unwrap_or_default(),
            generation: v.attachment.as_ref().map_or(0, |a| a.generation),
            readonly: v.attachment.as_ref().is_some_and(|a| a.readonly),
            block: v.attachment.as_ref().is_some_and(|a| a.block),
            annotations: v.annotations.clone().into_iter().collect(),
            replicas: v
                .replicas
                .iter()
                .map(|r| {
                    let (state, ejected_at_epoch) =
                        d.replicas.get(&r.id).cloned().unwrap_or_else(|| ("unknown".to_owned(), 0));
                    pb::ReplicaInfo {
                        id: r.id.clone(),
                        node: r.node.clone(),
                        state,
                        ejected_at_epoch,
                        lost_seconds: d.lost.get(&r.id).copied().unwrap_or(0),
                    }
                })
                .collect(),
            epoch: d.epoch,
            abnormal: d.condition.abnormal,
            condition: d.condition.message,
            rebuild: d.rebuild.map(|r| pb::RebuildInfo {
                replica: r.replica,
                kind: r.kind,
                phase: r.phase,
                done_bytes: r.done_bytes,
                total_bytes: r.total_bytes,
            }),
            created_unix: v.created_unix,
            scrub: d.scrub.map(|s| pb::ScrubInfo {
                running: s.running,
                done_bytes: s.done_bytes,
                total_bytes: s.total_bytes,
                damaged: s.damaged,
                repaired_bytes: s.repaired_bytes,
                unrepaired: s.unrepaired,
                started_unix: s.started_unix,
                finished_unix: s.finished_unix,
                error: s.error,
            }),
            damaged_ranges: d.damage.0,
            repaired_bytes: d.damage.1,
            unrepaired_ranges: d.damage.2,
            replicas_replenished: v.replicas_replenished,
            replenish_after_seconds: v.params.replenish_after().map_or(0, |w| w.as_secs()),
            lost_replicas: v.lost_replicas.iter().map(|r| format!("{}@{}", r.id, r.node)).collect(),
            clone: self
                .service
                .clone_progress(&v.id)
                .map(|(done_bytes, total_bytes)| pb::CloneProgress { done_bytes, total_bytes }),
        }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Admin {
    async fn list_volumes(
        &self,
        _: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let vols = self.service.volumes_in_use().await.map_err(status)?;
        let mut volumes = Vec::with_capacity(vols.len());
        for v in &vols {
            volumes.push(self.info(v).await);
        }
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn get_volume(
        &self,
        req: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::VolumeInfo>, Status> {
        let v = self.service.find_volume(&req.into_inner().volume).await.map_err(status)?;
        Ok(Response::new(self.info(&v).await))
    }

    async fn annotate(&self, req: Request<pb::AnnotateRequest>) -> Result<Response<pb::VolumeInfo>, Status> {
        let r = req.into_inner();
        if r.key.is_empty() {
            return Err(status(ControllerError::InvalidArgument("key is required".into())));
        }
        let v = self.service.annotate(&r.volume, &r.key, &r.value).await.map_err(status)?;
        Ok(Response::new(self.info(&v).await))
    }

    async fn kill_replica(
        &self,
        req: Request<pb::KillReplicaRequest>,
    ) -> Result<Response<pb::KillReplicaResponse>, Status> {
        let r = req.into_inner();
        let pid = self.service.kill_replica(&r.volume, &r.replica).await.map_err(status)?;
        Ok(Response::new(pb::KillReplicaResponse { pid }))
    }

    async fn scrub_volume(
        &self,
        req: Request<pb::ScrubVolumeRequest>,
    ) -> Result<Response<pb::VolumeInfo>, Status> {
        let v = self.service.scrub(&req.into_inner().volume).await.map_err(status)?;
        Ok(Response::new(self.info(&v).await))
    }

    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let snaps = self.service.snapshots_named().await.map_err(status)?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: snaps
                .into_iter()
                .map(|(s, volume_name)| pb::SnapshotInfo {
                    id: s.id,
                    name: s.name,
                    volume_id: s.volume_id,
                    volume_name,
                    size_bytes: s.size,
                    created_unix: s.created_unix,
                    ready: s.ready,
                    group_id: s.group.as_ref().map(|g| g.id.clone()).unwrap_or_default(),
                    group_name: s.group.map(|g| g.name).unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.service.nodes_usage().await.map_err(status)?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes
                .into_iter()
                .map(|(n, provisioned, replicas)| pb::NodeInfo {
                    name: n.name,
                    zone: n.zone.unwrap_or_default(),
                    capacity_bytes: n.capacity,
                    provisioned_bytes: provisioned,
                    replicas,
                })
                .collect(),
        }))
    }
}
