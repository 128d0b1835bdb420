//! The replica's gRPC management API: create, open and delete the store, snapshots outside an
//! engine, resize, stat, and clones with streamed progress. Every call must carry the volume's
//! token (`authorization: Bearer <token>`).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::error::StoreError;
use crate::server::{Replica, blocking, token_matches};
use crate::store::{CopyMode, DEFAULT_CLUSTER_SIZE, FaultOp, FaultSpec, Store};

/// Generated code of `proto/replica.proto`.
#[allow(clippy::all, missing_debug_implementations, rust_2018_idioms)]
pub mod pb {
    tonic::include_proto!("barnacle.replica.v1");
}

use pb::replica_manager_server::{ReplicaManager, ReplicaManagerServer};

/// Maps a store error to a gRPC status: the one place the management API does so.
pub fn grpc_status(e: &StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::NotFound(_) | StoreError::SnapshotNotFound(_) => Status::not_found(msg),
        StoreError::AlreadyExists(_) | StoreError::SnapshotExists(_) => Status::already_exists(msg),
        StoreError::InvalidArgument(_) | StoreError::Unaligned { .. } => Status::invalid_argument(msg),
        StoreError::OutOfRange { .. } | StoreError::Shrink { .. } => Status::out_of_range(msg),
        StoreError::TooManySnapshots(_) => Status::resource_exhausted(msg),
        StoreError::SnapshotBusy(_) => Status::aborted(msg),
        StoreError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            Status::resource_exhausted(msg)
        }
        StoreError::StaleEpoch { .. } | StoreError::EpochConflict { .. } => Status::failed_precondition(msg),
        StoreError::Corrupt { .. } | StoreError::Failed(_) | StoreError::Checksum { .. } => {
            Status::data_loss(msg)
        }
        StoreError::Io { .. } | StoreError::Db(_) => Status::internal(msg),
    }
}

/// A gRPC interceptor admitting only calls that carry `authorization: Bearer <token>`; refusals
/// are logged with the volume id (never the token). Shared by every Barnacle management API.
pub fn bearer_check(
    token: &str,
    volume_id: &str,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static + use<> {
    let expected = format!("Bearer {token}");
    let volume_id = volume_id.to_owned();
    move |req: Request<()>| {
        let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        if token_matches(given, &expected) {
            Ok(req)
        } else {
            warn!(volume_id = %volume_id, "refused management call: wrong token");
            Err(Status::unauthenticated("missing or wrong token"))
        }
    }
}

/// The store's stat, read off the async threads (it takes the store's gate, which a snapshot
/// barrier can hold).
async fn stat_response(store: Arc<Store>) -> Result<pb::StatResponse, Status> {
    let s = blocking(move || store.stat()).await.map_err(|e| grpc_status(&e))?;
    Ok(pb::StatResponse {
        volume_id: s.volume_id,
        store_id: s.store_id.to_string(),
        size_bytes: s.size,
        cluster_size_bytes: s.cluster_size,
        allocated_bytes: s.allocated_bytes,
        disk_bytes: s.disk_bytes,
        snapshots: s.snapshots,
        epoch: s.epoch,
        engine_id: s.engine_id.map(|e| e.to_string()).unwrap_or_default(),
        healthy: s.failure.is_none(),
        failure: s.failure.unwrap_or_default(),
        checksums: s.checksums,
        checksum_errors: s.checksum_errors,
    })
}

/// The management service of one [`Replica`].
#[derive(Debug, Clone)]
pub struct Manager {
    replica: Arc<Replica>,
}

impl Manager {
    /// The tonic service, with the token check in front of every call.
    pub fn service(
        replica: Arc<Replica>,
    ) -> tonic::service::interceptor::InterceptedService<
        ReplicaManagerServer<Manager>,
        impl tonic::service::Interceptor + Clone,
    > {
        let check = bearer_check(&replica.config().token, &replica.config().volume_id);
        ReplicaManagerServer::with_interceptor(Manager { replica }, check)
    }

    fn store(&self) -> Result<Arc<Store>, Status> {
        self.replica.store().map_err(|e| grpc_status(&e))
    }
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::CloneProgress, Status>> + Send>>;

#[tonic::async_trait]
impl ReplicaManager for Manager {
    async fn create(&self, req: Request<pb::CreateRequest>) -> Result<Response<pb::StatResponse>, Status> {
        let r = req.into_inner();
        let cs = if r.cluster_size_bytes == 0 { DEFAULT_CLUSTER_SIZE } else { r.cluster_size_bytes };
        let store = self.replica.create_store(r.size_bytes, cs).await.map_err(|e| grpc_status(&e))?;
        Ok(Response::new(stat_response(store).await?))
    }

    async fn open(&self, _: Request<pb::OpenRequest>) -> Result<Response<pb::StatResponse>, Status> {
        let store = self.replica.open_store().await.map_err(|e| grpc_status(&e))?;
        Ok(Response::new(stat_response(store).await?))
    }

    async fn delete(&self, _: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        self.replica.delete_store().await.map_err(|e| grpc_status(&e))?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn stat(&self, _: Request<pb::StatRequest>) -> Result<Response<pb::StatResponse>, Status> {
        let store = self.store()?;
        Ok(Response::new(stat_response(store).await?))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let name = req.into_inner().name;
        let store = self.store()?;
        let s = blocking(move || store.create_snapshot(&name)).await.map_err(|e| grpc_status(&e))?;
        Ok(Response::new(pb::Snapshot { name: s.name, size_bytes: s.size, created_unix: s.created_unix }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let name = req.into_inner().name;
        let store = self.store()?;
        let cs = store.cluster_size();
        let n = blocking(move || store.delete_snapshot(&name)).await.map_err(|e| grpc_status(&e))?;
        Ok(Response::new(pb::DeleteSnapshotResponse { freed_bytes: n * cs }))
    }

    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let store = self.store()?;
        let snapshots = blocking(move || Ok(store.list_snapshots()))
            .await
            .map_err(|e| grpc_status(&e))?
            .into_iter()
            .map(|s| pb::Snapshot { name: s.name, size_bytes: s.size, created_unix: s.created_unix })
            .collect();
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn resize(&self, req: Request<pb::ResizeRequest>) -> Result<Response<pb::StatResponse>, Status> {
        let size = req.into_inner().size_bytes;
        let store = self.store()?;
        let s2 = store.clone();
        blocking(move || s2.resize(size)).await.map_err(|e| grpc_status(&e))?;
        Ok(Response::new(stat_response(store).await?))
    }

    type CloneSnapshotStream = ProgressStream;

    async fn clone_snapshot(
        &self,
        req: Request<pb::CloneSnapshotRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let r = req.into_inner();
        let name_ok = !r.target_name.is_empty()
            && r.target_name.len() <= 255
            && !r.target_name.contains('/')
            && r.target_name != "."
            && r.target_name != "..";
        if !name_ok {
            return Err(Status::invalid_argument("target_name must be a plain directory name"));
        }
        if r.target_volume_id.is_empty() || r.snapshot.is_empty() {
            return Err(Status::invalid_argument("snapshot and target_volume_id are required"));
        }
        let store = self.store()?;
        let parent = self
            .replica
            .dir()
            .parent()
            .ok_or_else(|| Status::failed_precondition("replica directory has no parent"))?;
        let target = parent.join(&r.target_name);
        if target == self.replica.dir() {
            return Err(Status::invalid_argument("target is this replica's own directory"));
        }
        let (tx, rx) = mpsc::channel(16);
        let volume_id = store.volume_id().to_owned();
        tokio::task::spawn_blocking(move || {
            let mut last_pct = u64::MAX;
            let res = store.clone_snapshot(&r.snapshot, &target, &r.target_volume_id, |done, total| {
                let pct = (done * 100).checked_div(total).unwrap_or(100);
                if pct != last_pct {
                    last_pct = pct;
                    info!(volume_id = %volume_id, snapshot = %r.snapshot, done, total, "clone progress");
                    let _ = tx.blocking_send(Ok(pb::CloneProgress {
                        done_bytes: done,
                        total_bytes: total,
                        finished: false,
                        mode: String::new(),
                    }));
                }
            });
            let last = res.map_err(|e| grpc_status(&e)).map(|rep| pb::CloneProgress {
                done_bytes: rep.bytes,
                total_bytes: rep.bytes,
                finished: true,
                mode: match rep.mode {
                    CopyMode::Reflink => "reflink",
                    CopyMode::Copy => "copy",
                }
                .into(),
            });
            let _ = tx.blocking_send(last);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn inject_faults(
        &self,
        req: Request<pb::InjectFaultsRequest>,
    ) -> Result<Response<pb::InjectFaultsResponse>, Status> {
        if !self.replica.config().fault_injection {
            return Err(Status::failed_precondition(
                "fault injection is off: start the replica with --fault-injection",
            ));
        }
        let faults = req.into_inner().faults.iter().map(fault_spec).collect::<Result<Vec<_>, _>>()?;
        self.store()?.inject_faults(faults);
        Ok(Response::new(pb::InjectFaultsResponse {}))
    }
}

fn fault_spec(f: &pb::Fault) -> Result<FaultSpec, Status> {
    let op = match f.op.as_str() {
        "read" => FaultOp::Read,
        "write" => FaultOp::Write,
        "sync" => FaultOp::Sync,
        other => return Err(Status::invalid_argument(format!("fault op {other:?}: read, write or sync"))),
    };
    let errno = match f.error.as_str() {
        "eio" | "" => libc::EIO,
        "enospc" => libc::ENOSPC,
        other => return Err(Status::invalid_argument(format!("fault error {other:?}: eio or enospc"))),
    };
    Ok(FaultSpec {
        op,
        errno,
        offset: f.offset,
        len: f.length,
        count: f.count,
        duration: (f.duration_ms > 0).then(|| std::time::Duration::from_millis(f.duration_ms)),
    })
}
