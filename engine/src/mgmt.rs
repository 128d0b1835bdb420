//! The engine's gRPC management API: status, snapshots as IO barriers, expansion, adding and
//! removing replicas, and shutdown. Every call must carry the volume's token (`authorization: Bearer <token>`).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::authority::{ReplicaState, VolumeSettings};
use crate::nbd::{Backend, IoError};
use crate::volume::{SettingsError, Volume};

/// Generated code of `proto/engine.proto`.
#[allow(clippy::all, missing_debug_implementations, rust_2018_idioms)]
pub mod pb {
    tonic::include_proto!("barnacle.engine.v1");
}

use pb::engine_manager_server::{EngineManager, EngineManagerServer};

/// Maps an IO error to a gRPC status: the one place the management API does so.
pub fn grpc_status(e: &IoError) -> Status {
    let msg = e.to_string();
    match e {
        IoError::Invalid(_) => Status::invalid_argument(msg),
        IoError::NoSpace => Status::resource_exhausted(msg),
        IoError::Shutdown => Status::unavailable(msg),
        IoError::Io(_) => Status::unavailable(msg),
    }
}

/// The management service of one engine.
#[derive(Debug, Clone)]
pub struct Manager {
    volume: Arc<Volume>,
    shutdown: CancellationToken,
}

impl Manager {
    /// The tonic service, with the token check in front of every call. `shutdown` fires on a
    /// Shutdown call.
    pub fn service(
        volume: Arc<Volume>,
        token: &str,
        shutdown: CancellationToken,
    ) -> tonic::service::interceptor::InterceptedService<
        EngineManagerServer<Manager>,
        impl tonic::service::Interceptor + Clone + use<>,
    > {
        let check = barnacle_replica::mgmt::bearer_check(token, volume.volume_id());
        EngineManagerServer::with_interceptor(Manager { volume, shutdown }, check)
    }

    fn status(&self) -> pb::StatusResponse {
        let m = self.volume.membership();
        let rebuild = self.volume.rebuild_progress();
        let (rebuilt_bytes, rebuilds_completed) = self.volume.rebuild_totals();
        let silence: std::collections::HashMap<_, _> = self.volume.member_silence().into_iter().collect();
        let settings = self.volume.settings();
        let (throttled_ios, waited) = self.volume.throttled();
        let damage = self.volume.damage_totals();
        pb::StatusResponse {
            volume_id: self.volume.volume_id().to_owned(),
            size_bytes: self.volume.size(),
            epoch: m.epoch,
            engine_id: self.volume.engine_id().to_string(),
            replicas: m
                .replicas
                .iter()
                .map(|r| pb::ReplicaStatus {
                    id: r.id.clone(),
                    address: r.addr.clone(),
                    state: match r.state {
                        ReplicaState::Healthy => "healthy",
                        ReplicaState::Ejected { .. }
                            if rebuild.as_ref().is_some_and(|p| p.replica == r.id) =>
                        {
                            "rebuilding"
                        }
                        ReplicaState::Ejected { .. } => "ejected",
                    }
                    .into(),
                    ejected_at_epoch: match r.state {
                        ReplicaState::Ejected { epoch } => epoch,
                        ReplicaState::Healthy => 0,
                    },
                    silent_ms: silence
                        .get(&r.id)
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                })
                .collect(),
            resynced_bytes: self.volume.resynced_bytes(),
            min_healthy_replicas: settings.min_healthy,
            settings: Some(settings_pb(&settings)),
            throttled_ios,
            throttled_micros: u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
            rebuild: rebuild.map(rebuild_pb),
            last_rebuild: self.volume.last_rebuild().map(rebuild_pb),
            rebuilds_completed,
            rebuilt_bytes,
            scrub: self.volume.scrub_progress().map(scrub_pb),
            damaged_ranges: damage.found,
            repaired_bytes: damage.repaired_bytes,
            unrepaired_ranges: damage.unrepaired,
        }
    }
}

fn scrub_pb(p: crate::volume::ScrubProgress) -> pb::Scrub {
    pb::Scrub {
        running: p.running,
        done_bytes: p.done_bytes,
        total_bytes: p.total_bytes,
        damaged: p.damaged,
        repaired_bytes: p.repaired_bytes,
        unrepaired: p.unrepaired,
        started_unix: p.started_unix,
        finished_unix: p.finished_unix,
        error: p.error.unwrap_or_default(),
    }
}

fn settings_pb(s: &VolumeSettings) -> pb::Settings {
    pb::Settings {
        min_healthy_replicas: s.min_healthy,
        rebuild_mib_per_sec: s.rebuild_mib_per_sec,
        max_iops: s.max_iops,
        max_mib_per_sec: s.max_mib_per_sec,
    }
}

fn rebuild_pb(p: crate::volume::RebuildProgress) -> pb::Rebuild {
    pb::Rebuild {
        replica: p.replica,
        kind: if p.full { "full" } else { "delta" }.into(),
        phase: p.phase.into(),
        done_bytes: p.done_bytes,
        total_bytes: p.total_bytes,
    }
}

#[tonic::async_trait]
impl EngineManager for Manager {
    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(Manager::status(self)))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.name.is_empty() || r.name.len() > barnacle_replica::store::MAX_SNAPSHOT_NAME {
            return Err(Status::invalid_argument("snapshot name must be 1 to 128 bytes"));
        }
        if r.hold_id.is_empty() {
            self.volume.create_snapshot(&r.name).await
        } else {
            self.volume.create_snapshot_held(&r.name, &r.hold_id).await
        }
        .map_err(|e| grpc_status(&e))?;
        Ok(Response::new(pb::SnapshotResponse {}))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let name = req.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("snapshot name is required"));
        }

        self.volume.delete_snapshot(&name).await.map_err(|e| grpc_status(&e))?;
        Ok(Response::new(pb::SnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let snapshots = self
            .volume
            .list_snapshots()
            .await
            .map_err(|e| grpc_status(&e))?
            .into_iter()
            .map(|s| pb::Snapshot { name: s.name, size_bytes: s.size, created_unix: s.created_unix })
            .collect();
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn expand(&self, req: Request<pb::ExpandRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let size = req.into_inner().size_bytes;
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(Status::invalid_argument("size must be a non-zero multiple of 4096"));
        }
        self.volume.expand(size).await.map_err(|e| grpc_status(&e))?;
        Ok(Response::new(Manager::status(self)))
    }

    async fn remove_replica(
        &self,
        req: Request<pb::RemoveReplicaRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let id = req.into_inner().id;
        self.volume.remove_replica(&id).await.map_err(|e| grpc_status(&e))?;
        Ok(Response::new(Manager::status(self)))
    }

    async fn add_replica(
        &self,
        req: Request<pb::AddReplicaRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let r = req.into_inner();
        self.volume.add_replica(&r.id, &r.address).await.map_err(|e| grpc_status(&e))?;
        Ok(Response::new(Manager::status(self)))
    }

    async fn configure(&self, req: Request<pb::Settings>) -> Result<Response<pb::StatusResponse>, Status> {
        let s = req.into_inner();
        let new = VolumeSettings {
            min_healthy: s.min_healthy_replicas,
            rebuild_mib_per_sec: s.rebuild_mib_per_sec,
            max_iops: s.max_iops,
            max_mib_per_sec: s.max_mib_per_sec,
        };
        self.volume.configure(new).await.map_err(|e| match e {
            SettingsError::Invalid(_) => Status::invalid_argument(e.to_string()),
            SettingsError::TooFewHealthy { .. } => Status::failed_precondition(e.to_string()),
            SettingsError::Io(io) => grpc_status(&io),
        })?;
        Ok(Response::new(Manager::status(self)))
    }

    async fn hold_io(&self, req: Request<pb::HoldIoRequest>) -> Result<Response<pb::HoldIoResponse>, Status> {
        let r = req.into_inner();
        let lease = std::time::Duration::from_millis(u64::from(r.lease_ms));
        self.volume.hold_io(&r.hold_id, lease).await.map_err(|e| grpc_status(&e))?;
        Ok(Response::new(pb::HoldIoResponse { released: false }))
    }

    async fn release_io(
        &self,
        req: Request<pb::HoldIoRequest>,
    ) -> Result<Response<pb::HoldIoResponse>, Status> {
        let released = self.volume.release_io(&req.into_inner().hold_id);
        Ok(Response::new(pb::HoldIoResponse { released }))
    }

    async fn scrub(&self, _: Request<pb::ScrubRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        self.volume.start_scrub();
        Ok(Response::new(Manager::status(self)))
    }

    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        info!(volume_id = %self.volume.volume_id(), "shutdown requested");
        self.shutdown.cancel();
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}
